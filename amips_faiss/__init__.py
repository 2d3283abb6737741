"""amips_faiss: maximum inner product search with learned support functions, on faiss IVF lists."""
from .index import IndexAMIPS, SearchParametersAMIPS, SearchStats, set_num_threads
from .io import read_index, write_index
from .nn import KeyNet, SupportNet
from .targets import SupportTargets, augment_queries, split_queries, support_values

__all__ = ["IndexAMIPS", "SearchParametersAMIPS", "SearchStats", "set_num_threads", "read_index", "write_index",
           "KeyNet", "SupportNet", "SupportTargets", "augment_queries", "split_queries", "support_values"]
__version__ = "0.1.0"
