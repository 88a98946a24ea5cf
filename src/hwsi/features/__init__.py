"""hwsi.features"""
