"""Datasets, partitioners and the simulated federation.

Example:
    >>> from potluck.data import Federation, describe
    >>> fed = Federation.from_config("digits", num_clients=4, partition="dirichlet",
    ...                              partition_options={"alpha": 0.5, "min_size": 5})
    >>> describe(fed)["num_clients"]
    4
"""

from potluck.data.describe import describe, label_entropy
from potluck.data.federation import ClientData, Federation
from potluck.data.partition import (
    PARTITION_KINDS,
    Partition,
    dirichlet,
    iid,
    label_quantity,
    make_partition,
    natural,
    quantity_skew,
    shards,
)
from potluck.data.sources import (
    ArrayDataset,
    DataSource,
    available_sources,
    download_fashion_mnist,
    find_fashion_mnist,
    load_source,
    verify_checksum,
)

__all__ = [
    "PARTITION_KINDS",
    "ArrayDataset",
    "ClientData",
    "DataSource",
    "Federation",
    "Partition",
    "available_sources",
    "describe",
    "dirichlet",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "iid",
    "label_entropy",
    "label_quantity",
    "load_source",
    "make_partition",
    "natural",
    "quantity_skew",
    "shards",
    "verify_checksum",
]
