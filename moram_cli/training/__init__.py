"""Training one task's new ranks (`learn-task`) on Accelerate."""
