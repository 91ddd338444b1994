"""Loading a model by name: GGUF files, Hugging Face folders and random weights, into the canonical layout."""
from model.loading.loader import (DEFAULT_MODEL, LoadedModel, build_model, load_model, parse_dtype, read_model,
                                  smollm2_path)
from model.loading.weights import LoadError

__all__ = ["DEFAULT_MODEL", "LoadError", "LoadedModel", "build_model", "load_model", "parse_dtype", "read_model",
           "smollm2_path"]
