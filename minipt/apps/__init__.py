"""The programs built on the method: the `minipt` command, the demo, the experiments, their plots, and the
recipes they train with. Nothing in `minipt/` outside this folder imports from it."""
