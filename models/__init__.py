"""The model zoo: architectures, manifests, export and the store of installed models."""
