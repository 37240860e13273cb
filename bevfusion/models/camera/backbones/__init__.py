"""Camera backbones: SwinTransformer (mmdet 2.20 layout) and ResNet (mmdet layout)."""
