"""The `ctxrobot` command line: parse, call one layer below, print, exit 0, 1 or 2. The only
package that may import every other one.
"""
