"""hwsi.slide"""
