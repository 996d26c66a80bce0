"""Prompt text handling and encoding. (The full prompt language arrives with issue 4.)"""
