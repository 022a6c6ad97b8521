"""Training-loop pieces shared by every stage: the denoising loss, accelerate set-up, checkpoints and resume."""
