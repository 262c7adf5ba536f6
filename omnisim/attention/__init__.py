"""OmniAttn (OmniInfer's layer-wise sparse attention on decode instances): the spec the simulator and the real
backends read, and the offline search for its layer pattern."""
from omnisim.attention.omni_attn import DecodePools, OmniAttn

__all__ = ["DecodePools", "OmniAttn"]
