"""configurator"""
