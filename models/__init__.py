"""Flax models (installed as `longtrain.models`): Llama-family decoders and the lightning/softmax hybrid."""
