"""Model toolchain: resolve a base model, cache a Hugging Face copy, write manifests."""

from models.base import BASES, cache_dir, prepare_base

__all__ = ["BASES", "cache_dir", "prepare_base"]
