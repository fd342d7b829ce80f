"""The CUDA launchers on the CPU harness, counting the launches of each kernel: shared by the kernel
tests (import it after their check for a C++ compiler: the harness compiles kernels/*.cu)."""
import collections

from caffeish.kernels import harness, launch


class CountingKernels(launch.Kernels):
    """caffeish.kernels.launch.Kernels on the harness; `count` holds the launches by kernel name
    (crop_rows also as "crop_rows long" / "crop_rows short": rows shorter than a warp share one),
    `last` the last launch as (name, grid, block, args)."""

    def __init__(self, col_budget=1 << 20):
        super().__init__(harness.XP, harness.module, col_budget)
        self.count = collections.Counter()
        self.last = None

    def launch(self, module, name, grid, block, args):
        self.count[name] += 1
        if name == "crop_rows":
            self.count["crop_rows " + ("long" if int(args[4]) >= 32 else "short")] += 1
        self.last = (name, grid, block, args)
        super().launch(module, name, grid, block, args)
