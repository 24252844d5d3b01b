"""meshfed: peer-to-peer federated learning and inference on equal trio nodes.

Start a node with ``async with open_node(NodeConfig(...)) as node:``. Errors live in
:mod:`meshfed.errors`, wire messages in :mod:`meshfed.control` and :mod:`meshfed.wire`.
"""

from .config import NodeConfig as NodeConfig
from .control import Text as Text
from .identity import Identity as Identity
from .identity import PeerId as PeerId
from .membership.records import Role as Role
from .node import Node as Node
from .node import open_node as open_node
from .wire import Envelope as Envelope
from .wire import Message as Message
from .wire import Scope as Scope
from .wire import message as message

__all__ = [
    "Envelope",
    "Identity",
    "Message",
    "Node",
    "NodeConfig",
    "PeerId",
    "Role",
    "Scope",
    "Text",
    "message",
    "open_node",
]
