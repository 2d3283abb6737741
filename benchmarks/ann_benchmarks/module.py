"""ann-benchmarks entry point: copy this folder to ann_benchmarks/algorithms/amips_faiss/."""
from amips_faiss.ann_benchmarks import AMIPS  # noqa: F401
