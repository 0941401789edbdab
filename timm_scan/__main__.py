"""``python -m timm_scan COMMAND ...`` and ``accelerate launch -m timm_scan train ...``."""

from .cli import main

if __name__ == "__main__":
    main()
