"""hwsi.serve"""
