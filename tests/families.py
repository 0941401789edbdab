"""The model families the test suite wraps, each small enough for 2 CPU cores. One list for the tests
and for ``benchmarks/onnx_export.py --families``, which exports them all."""

# (model name, input size): CNNs at 32x32; ViT and Swin need their fixed size
FAMILIES = [
    ("resnet18", 32),
    ("resnet50", 32),
    ("efficientnet_b0", 32),
    ("mobilenetv3_large_100", 32),
    ("convnext_atto", 32),
    ("regnetx_002", 32),
    ("densenet121", 32),
    ("vgg11_bn", 32),
    ("vit_tiny_patch16_224", 224),
    ("swin_tiny_patch4_window7_224", 224),
]

# (model, create kwargs that keep it small, input side, runner): one per family whose forward is not its
# children in order, all refused before the traced runner and the distilled heads (issue 16)
FAMILIES_NOT_IN_ORDER = [
    ("beit_base_patch16_224", {"img_size": 64, "depth": 4, "embed_dim": 64, "num_heads": 2}, 64, "traced"),
    ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 4}, 56, "traced"),
    ("cait_xxs24_224", {"img_size": 64, "depth": 4}, 64, "traced"),
    ("xcit_nano_12_p16_224", {"img_size": 64, "depth": 4}, 64, "traced"),
    ("tnt_s_patch16_224", {"img_size": 64, "depth": 4}, 64, "traced"),
    ("deit3_small_patch16_224", {"img_size": 64, "depth": 4}, 64, "vit"),
    ("mixer_s16_224", {"img_size": 64}, 64, "traced"),
    ("resmlp_12_224", {"img_size": 64}, 64, "traced"),
    ("twins_pcpvt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, 64, "traced"),
    ("mvitv2_tiny", {"img_size": 64}, 64, "traced"),
    ("fastvit_t8", {}, 64, "traced"),
    ("volo_d1_224", {"img_size": 64}, 64, "traced"),
    ("nest_tiny", {"img_size": 64}, 64, "traced"),
    ("coat_lite_tiny", {"img_size": 64}, 64, "traced"),
    ("pit_ti_224", {"img_size": 64}, 64, "traced"),
    ("visformer_tiny", {"img_size": 64}, 64, "traced"),
    ("xception41", {}, 64, "traced"),
    ("selecsls42b", {}, 64, "traced"),
    ("hrnet_w18_small", {}, 64, "traced"),  # stages found by their forward_intermediates maps
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 4}, 64, "vit"),
    ("levit_128s", {"img_size": 64}, 64, "traced"),
    ("efficientformer_l1", {}, 224, "sequential"),
    ("efficientformerv2_s0", {}, 224, "sequential"),
]
