"""Root conftest: import order matters in this environment.

`import torchvision` after `import tensorflow` in one process segfaults (tensorflow-cpu 2.21,
torchvision 0.29.1; see docs/design.md, section 5). Importing torchvision first, when it is installed, avoids it
for every test module, whatever order pytest collects them in.
"""
try:
    import torchvision  # noqa: F401
except ImportError:  # the core tests run without the torch extra
    pass
