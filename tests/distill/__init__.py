"""Tests of the distillation losses and loop."""
