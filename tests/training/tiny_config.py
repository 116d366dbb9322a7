"""The tiny model and stage list shared by the training, CLI and reliability tests."""

TINY = [
    "--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=4", "--model.num_kv_heads=2",
    "--model.ffn_hidden_size=48", "--model.max_seq_len=96",
    "--vision.image_size=16", "--vision.patch_size=8", "--vision.hidden_size=16", "--vision.num_heads=2",
    "--vision.num_layers=1", "--vision.ffn_hidden_size=32",
    "--moe.layers=1", "--moe.expert_backend=torch", "--router.backend=torch",
    "--data.seq_len=84", "--data.num_images=48", "--data.num_test_images=8", "--data.num_eval_samples=8",
    "--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.log_interval=1", "--train.progress_bar=false",
    "--train.tensorboard=false", "--train.save_interval=2",
]

STAGES = ("--stages=["
          "{name: projector, trainable: ['projector.*'], data: captions.json, conversation_template: plain, steps: 2,"
          " eval: false},"
          "{name: warmup, trainable: ['llm.*', 'projector.*'], steps: 3, eval: false},"
          "{name: evolution, trainable: ['llm.layers.{moe}.mlp.*'], steps: 3, moe_mode: evolve, eval: false},"
          "{name: router, trainable: ['llm.layers.{moe}.mlp.router.*'], steps: 3, moe_mode: sparse}]")
