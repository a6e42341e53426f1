"""Measure sample quality with the project's own digit classifier.

The program is ``diffusion_jax/commands/evaluate.py`` (installed as ``diffusion-evaluate`` too);
``python evaluate.py --help`` lists its flags.
"""

if __name__ == "__main__":
    # (only this light import before the Ctrl-C handler is installed: the package imports jax
    # lazily)
    from diffusion_jax.commands.evaluate import run

    run("evaluate.py")
