"""The interactive streaming demo (Gradio): ``inferix demo`` or ``python -m inferix.app``.

``app.hub`` holds the engine side (sessions per tab, the stepping thread), ``app.server`` the page.
"""
