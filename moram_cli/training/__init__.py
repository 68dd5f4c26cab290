"""Training one task's new ranks (`learn-task`) on Accelerate."""

from moram_cli.quiet_deepspeed import import_deepspeed_quietly

import_deepspeed_quietly()
