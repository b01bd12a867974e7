"""Print what a test or benchmark run runs on: the versions, the CPU kernels torch dispatches to
(``torch.backends.cpu.get_cpu_capability()``: DEFAULT, AVX2, AVX512, …), the threads, and the
signals the shell left ignored (a background job or ``nohup`` ignores SIGINT/SIGHUP)."""

import platform
import signal


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def main() -> None:
    import accelerate
    import torch
    import transformers

    ignored = [s.name for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM) if signal.getsignal(s) == signal.SIG_IGN]
    print(f"== python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"accelerate {accelerate.__version__}")
    print(f"== {platform.machine()} {cpu_model()}: torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} torch threads, signals ignored by the shell: {', '.join(ignored) or 'none'}")


if __name__ == "__main__":
    main()
