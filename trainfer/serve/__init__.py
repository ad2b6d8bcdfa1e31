"""Serving: bundles, preprocessing, output kinds, the Predictor, ensembles, batch prediction,
export, runtimes and quantization: everything between a trained model and its answers."""
