"""amips_faiss: maximum inner product search with learned support functions, on faiss IVF lists."""
from .confidence import Calibration
from .index import IndexAMIPS, default_nlist, set_num_threads
from .io import deserialize_index, read_index, serialize_index, write_index
from .nn import KeyNet, SupportNet
from .parameters import SearchParametersAMIPS, SearchStats
from .routing import Router
from .targets import SupportTargets, augment_queries, split_queries, support_values
from .training import TrainConfig

__all__ = ["IndexAMIPS", "SearchParametersAMIPS", "SearchStats", "Calibration", "TrainConfig", "Router",
           "default_nlist", "set_num_threads", "read_index", "write_index", "serialize_index", "deserialize_index",
           "KeyNet", "SupportNet", "SupportTargets", "augment_queries", "split_queries", "support_values"]
__version__ = "0.2.0"
