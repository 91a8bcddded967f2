"""headsteer.runtime: the gated, steerable ViT, its bundle format and the Engine a service embeds."""
from headsteer.runtime.errors import BundleError, DataError, HeadsteerError, InputError, UnsupportedModelError
from headsteer.runtime.gated_vit import GatedViT, GatedViTOutput, HeadGate, SparseAutoencoder, identity_steering

__all__ = [
    "BundleError",
    "DataError",
    "GatedViT",
    "GatedViTOutput",
    "HeadGate",
    "HeadsteerError",
    "InputError",
    "SparseAutoencoder",
    "UnsupportedModelError",
    "identity_steering",
]
