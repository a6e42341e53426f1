"""Train (or resume) a guided diffusion model.

The program is ``diffusion_jax/commands/train.py`` (installed as ``diffusion-train`` too);
``python train.py --help`` lists its flags.
"""

if __name__ == "__main__":
    # (only this light import before the Ctrl-C handler is installed: the package imports jax
    # lazily)
    from diffusion_jax.commands.train import run

    run("train.py")
