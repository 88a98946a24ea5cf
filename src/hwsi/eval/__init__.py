"""hwsi.eval"""
