"""Model zoo (small PyTorch classifiers), PyTorch/Keras twins, pretrained EfficientNet-Lite0 and
sample images. Submodules import their frameworks; this package imports nothing."""
