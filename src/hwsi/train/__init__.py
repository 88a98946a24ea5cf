"""hwsi.train"""
