"""Knowledge distillation: the loss functions (losses.py) and the teacher-beside-student training loop."""
