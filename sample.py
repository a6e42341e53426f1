"""Sample from a trained checkpoint: a class-ordered grid, a GIF of the reverse chain, an .npz.

The program is ``diffusion_jax/commands/sample.py`` (installed as ``diffusion-sample`` too);
``python sample.py --help`` lists its flags.
"""

if __name__ == "__main__":
    # (only this light import before the Ctrl-C handler is installed: the package imports jax
    # lazily)
    from diffusion_jax.commands.sample import run

    run("sample.py")
