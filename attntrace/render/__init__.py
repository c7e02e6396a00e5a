"""Renderers: rich views and JSON documents.  No math here: values, stats and
summaries come from the engine; renderers only lay them out."""
