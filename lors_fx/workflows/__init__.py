"""The end-to-end workflows on top of the API: prune, data, train, evaluate, the embedded
default model, and the demo that chains them."""
