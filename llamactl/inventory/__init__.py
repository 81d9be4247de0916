"""The inventory: the whole description of one cluster, loaded with exact error positions.

    inv = load_inventory("inventory.yaml")     # raises InventoryError listing every problem
    for inst in inv.instances(): ...
"""

from llamactl.inventory.cluster import BalancerHost, BalancerSpec, HostSpec, Instance, Inventory, RedisSpec
from llamactl.inventory.envfile import expected_env
from llamactl.inventory.load import load_inventory
from llamactl.inventory.model import (
    ApiKeysRef,
    CacheSettings,
    GenerationSettings,
    HealthSpec,
    ModelSettings,
    PipSettings,
    RateLimit,
    RedisSettings,
    RolloutSpec,
    ServerSettings,
    SSHSettings,
    TLSSettings,
)

__all__ = [
    "ApiKeysRef", "BalancerHost", "BalancerSpec", "CacheSettings", "GenerationSettings", "HealthSpec",
    "HostSpec", "Instance", "Inventory", "ModelSettings", "PipSettings", "RateLimit", "RedisSettings",
    "RedisSpec", "RolloutSpec",
    "SSHSettings", "ServerSettings", "TLSSettings", "expected_env", "load_inventory",
]
