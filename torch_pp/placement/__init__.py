"""Where the layers go: the plan (half-open layer ranges per rank), sizing and the fit check.

Pure: reads config.json and safetensors headers, never the network or the weights.
"""
