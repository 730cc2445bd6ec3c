"""Networks shared by the pretraining methods: ResNet backbones, FPN, R-CNN head, MLPs."""
