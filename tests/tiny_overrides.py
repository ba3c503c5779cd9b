"""The smallest config that still runs every notebook end to end: 64-px scenes, width 32, 8 queries, a 16x16
mask code (``--set`` overrides on top of the ``smoke`` preset). Shared by the notebook tests."""

TINY = ["data.synth_num_train=6", "data.synth_num_val=3", "data.synth_image_size=64", "data.train_scales=[48,64]",
        "data.max_size=64", "data.crop_resize_scales=[64]", "data.crop_min=40", "data.crop_max=64",
        "data.eval_size=64", "model.hidden_dim=32", "model.dim_feedforward=64", "model.nheads=2",
        "model.num_queries=8", "model.vector_hidden_dim=32", "codec.resolution=16", "codec.num_coeffs=16",
        "runtime.num_threads=1"]
