"""The frame-pair example: the original study's model, built with inflate.

A pretrained single-frame network that predicts a dense coordinate map is
inflated to two frames, then to ten; see README.md beside this file.
"""
