"""Read run directories, diff standard against cyclic curves, draw the paper's figures."""
