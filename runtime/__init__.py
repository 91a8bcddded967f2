"""headsteer.runtime: the gated, steerable ViT, its bundle format and the Engine a service embeds."""
from headsteer.runtime.errors import BundleError, DataError, HeadsteerError, InputError, UnsupportedModelError
from headsteer.runtime.gated_vit import GatedViT, GatedViTOutput, HeadGate, SparseAutoencoder, identity_steering
from headsteer.runtime.bundle import BundleInfo, SteeringTable, load_bundle, save_bundle  # noqa: E402 (needs gated_vit)
from headsteer.runtime.engine import Engine  # noqa: E402 (needs bundle)

__all__ = [
    "BundleError",
    "BundleInfo",
    "DataError",
    "Engine",
    "GatedViT",
    "GatedViTOutput",
    "HeadGate",
    "HeadsteerError",
    "InputError",
    "SparseAutoencoder",
    "SteeringTable",
    "UnsupportedModelError",
    "identity_steering",
    "load_bundle",
    "save_bundle",
]
