"""The smallest config that still runs every notebook end to end: 64-px scenes, width 32, 8 queries, a 16x16
mask code (``--set`` overrides on top of the ``smoke`` preset). Shared by the notebook tests."""

TINY = ["data.synth_num_train=6", "data.synth_num_val=3", "data.synth_image_size=64", "data.train_scales=[48,64]",
        "data.max_size=64", "data.crop_resize_scales=[64]", "data.crop_min=40", "data.crop_max=64",
        "data.eval_size=64", "model.hidden_dim=32", "model.dim_feedforward=64", "model.nheads=2",
        "model.num_queries=8", "model.vector_hidden_dim=32", "codec.resolution=16", "codec.num_coeffs=16",
        "runtime.num_threads=1", "train.batch_size=2", "eval.batch_size=2"]

# The release's model and recipe at the smoke size (the smoke preset before the CPU recipe): ResNet-18 with frozen
# BatchNorm (stem and layer1 frozen), two single-stage levels, focal classification, lr 2e-4 with the backbone at
# 2e-5, the epoch StepLR, no step limit, the resize-crop augmentation. Tests of the release's layout and behaviour
# (state-dict mapping, parity, parameter groups, the training loop's bookkeeping) start from it.
RELEASE_LIKE = ["model.backbone=resnet18", "model.backbone_weights=", "model.backbone_norm=frozen",
                "model.freeze_stages=2", "model.two_stage=false", "model.num_feature_levels=2", "loss.cls_loss=focal",
                "model.vector_standardize=false", "train.lr=2e-4", "train.lr_backbone=2e-5", "train.lr_schedule=step", "train.warmup_steps=0",
                "train.max_steps=0", "train.batch_size=2", "train.epochs=2", "data.crop_prob=0.5",
                "model.hidden_dim=64", "model.dim_feedforward=128", "model.dec_layers=2"]
