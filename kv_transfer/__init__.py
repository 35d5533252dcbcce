"""KV block transfer between nodes over NIXL: the prefill node pushes (WRITEs) finished
blocks into the decode node's pool, the decode node tracks their arrival.

Start with `agent.TransferAgent` (both sides) and `arrivals.ArrivalTracker` (decode side);
`tags` defines the notification format, `layout` the pool descriptor and run coalescing.
"""

from splitserve.kv_transfer.agent import TransferAgent
from splitserve.kv_transfer.arrivals import ArrivalTracker, RequestArrival
from splitserve.kv_transfer.compat import IncompatiblePeer, KvCompat
from splitserve.kv_transfer.config import TransferConfig
from splitserve.kv_transfer.layout import PoolDescriptor, Run, coalesce_runs
from splitserve.kv_transfer.tags import ChunkTag, decode_tag, encode_tag
from splitserve.kv_transfer.types import Notification, PeerName, PushHandle, PushResult

__all__ = [
    "ArrivalTracker",
    "ChunkTag",
    "IncompatiblePeer",
    "KvCompat",
    "Notification",
    "PeerName",
    "PoolDescriptor",
    "PushHandle",
    "PushResult",
    "RequestArrival",
    "Run",
    "TransferAgent",
    "TransferConfig",
    "coalesce_runs",
    "decode_tag",
    "encode_tag",
]
