"""The command-line programs ``train``, ``sample`` and ``evaluate``.

Each module has ``main(argv, prog) -> exit code`` (what the tests call) and ``run(prog)``, the
entry point of ``diffusion-train``/``diffusion-sample``/``diffusion-evaluate`` and of the root
scripts ``train.py``/``sample.py``/``evaluate.py``. Importing a command module does not import
jax, so ``--help`` is quick and Ctrl-C is handled from the start (:func:`diffusion_jax.cli.start`).
"""
