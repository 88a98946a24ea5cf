"""hwsi.synth"""
