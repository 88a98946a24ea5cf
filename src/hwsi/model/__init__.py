"""hwsi.model"""
