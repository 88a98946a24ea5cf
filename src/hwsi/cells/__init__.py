"""hwsi.cells"""
