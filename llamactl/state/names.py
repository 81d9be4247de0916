"""The Redis key names llamactl uses (pure constants: the controller reads them without the redis client)."""

STREAM = "llamactl:jobs"  # the jobs stream
GROUP = "servers"  # its consumer group
CACHE_PREFIX = "llamactl:cache:"  # the cluster-wide result cache
CACHE_BYTES = CACHE_PREFIX + "bytes"  # its byte count
USAGE = "llamactl:usage:"  # + key name: hash of cluster-wide usage
