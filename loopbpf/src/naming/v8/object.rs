//! Named properties of JS objects, read from outside as V8 keeps them: a fast-mode object's
//! map lists its own properties in a `DescriptorArray` (key, details, value per property; the
//! details say whether the value sits in a field, in the object itself or in its
//! `PropertyArray`, or in the descriptor); a dictionary-mode object keeps them in a
//! `NameDictionary` (a hash table of key, value and details). The postmortem metadata gives
//! the offsets and bit fields (`v8dbg_prop_*`, `v8dbg_class_Map__*`, the dictionary shape).
//!
//! Every length read is bounded before it is used, every pointer type-checked before it is
//! followed; what a map says of a property is cached by the map, checked again on each use
//! against the map's descriptor array and bit field.

use std::collections::HashMap;

use super::{JsNamer, heap::heap_object, heap::smi, layout::metadata_value};
use crate::target::memory::ReadMemory;

/// V8 keeps at most this many descriptors in a map.
const MAX_DESCRIPTORS: u64 = 1020;
/// Entries of a dictionary-mode object's hash table looked at.
const MAX_DICTIONARY_ENTRIES: u64 = 256;
/// Longest property name looked up (the names are ours, a handful of short ones).
const MAX_KEY: usize = 32;

/// How V8 lays out objects and their properties, from the postmortem metadata.
#[derive(Debug, Clone)]
pub struct ObjectLayout {
    /// `JSReceiver::raw_properties_or_hash`: the `PropertyArray` or dictionary.
    pub properties: u64,
    /// `JSObject::elements`; a `JSArray`'s length follows it.
    pub elements: u64,
    pub descriptors: u64,
    pub instance_size_words: u64,
    pub inobject_start_words: u64,
    pub dictionary_map_bit: u32,
    pub own_descriptors_mask: u32,
    pub own_descriptors_shift: u32,
    pub descriptor_header: u64,
    /// Words per descriptor, and where its key, details and value are.
    pub descriptor_size: u64,
    pub descriptor_key: u64,
    pub descriptor_details: u64,
    pub descriptor_value: u64,
    pub kind_mask: i64,
    pub kind_data: i64,
    pub location_mask: i64,
    pub location_field: i64,
    pub location_shift: u32,
    pub index_mask: i64,
    pub index_shift: u32,
    pub representation_mask: i64,
    pub representation_shift: u32,
    pub representation_double: i64,
    /// The first entry of a `NameDictionary`, and its words per entry (key, value, details).
    pub dictionary_entries: u64,
    pub dictionary_entry_size: u64,
    pub js_object: u16,
    pub js_array: u16,
    /// Symbols, and where one keeps its description.
    pub symbol: u16,
    pub symbol_description: u64,
    pub property_array: u16,
    pub descriptor_arrays: [u16; 2],
}

impl ObjectLayout {
    /// The layout from a binary's metadata; what is missing when it cannot be read.
    pub fn from_metadata(values: &HashMap<String, i64>) -> Result<Self, String> {
        let get =
            |name: &str| metadata_value(values, name).ok_or_else(|| format!("no v8dbg_{name}"));
        let offset = |name: &str| {
            get(name).and_then(|v| u64::try_from(v).map_err(|e| format!("{name}: {e}")))
        };
        let shift = |name: &str| {
            get(name).and_then(|v| u32::try_from(v).map_err(|e| format!("{name}: {e}")))
        };
        let tag = |name: &str| {
            get(name).and_then(|v| u16::try_from(v).map_err(|e| format!("{name}: {e}")))
        };
        let layout = Self {
            properties: offset("class_JSReceiver__raw_properties_or_hash__")?,
            elements: offset("class_JSObject__elements__")?,
            descriptors: offset("class_Map__instance_descriptors__")?,
            instance_size_words: offset("class_Map__instance_size_in_words__")?,
            inobject_start_words: offset(
                "class_Map__inobject_properties_start_or_constructor_function_index__",
            )?,
            dictionary_map_bit: shift("bit_field3_is_dictionary_map_shift")?,
            own_descriptors_mask: shift("bit_field3_number_of_own_descriptors_mask")?,
            own_descriptors_shift: shift("bit_field3_number_of_own_descriptors_shift")?,
            descriptor_header: offset("class_DescriptorArray__header_size__")?,
            descriptor_size: offset("prop_desc_size")?,
            descriptor_key: offset("prop_desc_key")?,
            descriptor_details: offset("prop_desc_details")?,
            descriptor_value: offset("prop_desc_value")?,
            kind_mask: get("prop_kind_mask")?,
            kind_data: get("prop_kind_Data")?,
            location_mask: get("prop_location_mask")?,
            location_field: get("prop_location_Field")?,
            location_shift: shift("prop_location_shift")?,
            index_mask: get("prop_index_mask")?,
            index_shift: shift("prop_index_shift")?,
            representation_mask: get("prop_representation_mask")?,
            representation_shift: shift("prop_representation_shift")?,
            representation_double: get("prop_representation_double")?,
            dictionary_entries: offset("namedictionary_prefix_start_index")?
                + offset("namedictionaryshape_prefix_size")?,
            dictionary_entry_size: offset("namedictionaryshape_entry_size")?,
            js_object: tag("type_JSObject__JS_OBJECT_TYPE")?,
            js_array: tag("type_JSArray__JS_ARRAY_TYPE")?,
            symbol: tag("type_Symbol__SYMBOL_TYPE")?,
            symbol_description: offset("class_Symbol__name__")?,
            property_array: tag("type_PropertyArray__PROPERTY_ARRAY_TYPE")?,
            descriptor_arrays: [
                tag("type_DescriptorArray__DESCRIPTOR_ARRAY_TYPE")?,
                tag("type_StrongDescriptorArray__STRONG_DESCRIPTOR_ARRAY_TYPE")
                    .or_else(|_| tag("type_DescriptorArray__DESCRIPTOR_ARRAY_TYPE"))?,
            ],
        };
        // Shapes V8 has had for years; anything else is not a V8 we know how to read.
        let known = layout.descriptor_size == 3
            && layout.descriptor_key < 3
            && layout.descriptor_details < 3
            && layout.descriptor_value < 3
            && layout.dictionary_entry_size == 3
            && layout.dictionary_entries <= 8
            && layout.location_shift < 32
            && layout.index_shift < 32
            && layout.representation_shift < 32;
        if !known {
            return Err("property layout not one loopbpf knows".to_owned());
        }
        Ok(layout)
    }
}

/// Where a map keeps one of the properties looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// A field: in the object (word index from its start) or its `PropertyArray` (index).
    InObject(u64),
    OutOfObject(u64),
    /// A constant kept in the descriptor itself.
    Constant(u64),
}

/// What a map says of the properties looked up on it, and what it was read from.
#[derive(Debug, Clone)]
pub(super) struct MapProperties {
    /// The map's descriptor array and bit field 3 when read.
    read_from: (u64, i32),
    /// Looked-up name -> where its value is; `None`: not there (or not plain data).
    slots: Vec<(&'static str, Option<Slot>)>,
}

impl JsNamer {
    /// The tagged value of data property `name` of a JS object whose map is `map`, for each of
    /// `names` (all looked up at once: one pass over the map's descriptors).
    /// `None` for a name the object does not have as a plain data property, or that cannot be
    /// read.
    pub(super) fn properties<const N: usize>(
        &mut self,
        object: u64,
        map: u64,
        names: [&'static str; N],
    ) -> [Option<u64>; N] {
        let mut values = [None; N];
        let Some(ol) = self.layout.objects.clone() else {
            return values;
        };
        let Some(bit_field3) = self.memory.i32(map + self.layout.map_bit_field3) else {
            return values;
        };
        if (bit_field3 >> ol.dictionary_map_bit) & 1 != 0 {
            self.dictionary_properties(object, &ol, &names, &mut values);
            return values;
        }
        let Some(slots) = self.map_properties(map, bit_field3, &ol, &names) else {
            return values;
        };
        for (value, name) in values.iter_mut().zip(names) {
            let Some(&(_, Some(slot))) = slots.slots.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            *value = match slot {
                Slot::InObject(word) => self.memory.word(object + 8 * word),
                Slot::OutOfObject(index) => self.out_of_object(object, &ol, index),
                Slot::Constant(tagged) => Some(tagged),
            };
        }
        values
    }

    /// A field of the object's `PropertyArray`, within its length.
    fn out_of_object(&mut self, object: u64, ol: &ObjectLayout, index: u64) -> Option<u64> {
        let array = heap_object(self.memory.word(object + ol.properties)?)?;
        if self.instance_type(array)? != ol.property_array {
            return None;
        }
        // A Smi: the length in its low 10 bits, a hash above.
        let length =
            u64::try_from(smi(self.memory.word(array + self.layout.array_length)?)?).ok()? & 0x3ff;
        (index < length)
            .then(|| {
                self.memory
                    .word(array + self.layout.fixed_array_data + 8 * index)
            })
            .flatten()
    }

    /// Where a fast-mode map keeps `names`: from the cache when its descriptors are those it
    /// was read from, else read from its descriptor array.
    fn map_properties(
        &mut self,
        map: u64,
        bit_field3: i32,
        ol: &ObjectLayout,
        names: &[&'static str],
    ) -> Option<MapProperties> {
        let descriptors = heap_object(self.memory.word(map + ol.descriptors)?)?;
        let read_from = (descriptors, bit_field3);
        if let Some(known) = self.map_properties.get(&map)
            && known.read_from == read_from
            && names
                .iter()
                .all(|n| known.slots.iter().any(|(k, _)| k == n))
        {
            return Some(known.clone());
        }
        if !ol
            .descriptor_arrays
            .contains(&self.instance_type(descriptors)?)
        {
            return None;
        }
        let own = u64::from(
            (bit_field3.cast_unsigned() & ol.own_descriptors_mask) >> ol.own_descriptors_shift,
        );
        // The array's own count (an int16 right after its map) bounds the map's.
        let all = u64::from(self.memory.u16(descriptors + 8)?);
        if own > all || own > MAX_DESCRIPTORS {
            return None;
        }
        let inobject_start = u64::from(self.memory.u8(map + ol.inobject_start_words)?);
        let size_words = u64::from(self.memory.u8(map + ol.instance_size_words)?);
        let inobject = size_words.checked_sub(inobject_start)?;
        let bytes = self.memory.bytes(
            descriptors + ol.descriptor_header,
            usize::try_from(own * ol.descriptor_size * 8).ok()?,
        )?;
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        let mut slots = Vec::new();
        for descriptor in words.chunks_exact(3) {
            let key = descriptor[usize::try_from(ol.descriptor_key).ok()?];
            let Some(name) = self.key_among(key, names) else {
                continue;
            };
            let Some(details) = smi(descriptor[usize::try_from(ol.descriptor_details).ok()?])
            else {
                continue;
            };
            let value = descriptor[usize::try_from(ol.descriptor_value).ok()?];
            if let Some(slot) = slot_of(ol, details, value, inobject_start, inobject) {
                slots.push((name, slot));
            }
        }
        let found = MapProperties {
            read_from,
            slots: names
                .iter()
                .map(|&n| (n, slots.iter().find(|(k, _)| *k == n).map(|&(_, s)| s)))
                .collect(),
        };
        if self.may_cache() {
            let bytes = found.slots.len() * std::mem::size_of::<(&str, Option<Slot>)>();
            self.map_properties.insert(map, found.clone(), bytes);
        }
        Some(found)
    }

    /// Properties of a dictionary-mode object: a scan of its `NameDictionary`.
    fn dictionary_properties(
        &mut self,
        object: u64,
        ol: &ObjectLayout,
        names: &[&'static str],
        values: &mut [Option<u64>],
    ) -> Option<()> {
        let dictionary = heap_object(self.memory.word(object + ol.properties)?)?;
        let l = &self.layout;
        let (length_at, data) = (l.array_length, l.fixed_array_data);
        let length = u64::try_from(smi(self.memory.word(dictionary + length_at)?)?).ok()?;
        let capacity = u64::try_from(smi(self.memory.word(dictionary + data + 16)?)?).ok()?;
        // The table's own length says it is one: its prefix, then `capacity` entries.
        if capacity
            .checked_mul(ol.dictionary_entry_size)?
            .checked_add(ol.dictionary_entries)?
            != length
        {
            return None;
        }
        let entries = capacity.min(MAX_DICTIONARY_ENTRIES);
        let bytes = self.memory.bytes(
            dictionary + data + 8 * ol.dictionary_entries,
            usize::try_from(entries * 24).ok()?,
        )?;
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        for entry in words.chunks_exact(3) {
            let [key, value, details] = [entry[0], entry[1], entry[2]];
            let Some(name) = self.key_among(key, names) else {
                continue;
            };
            let Some(details) = smi(details) else {
                continue;
            };
            if details & ol.kind_mask != ol.kind_data {
                continue;
            }
            if let Some(i) = names.iter().position(|n| *n == name) {
                values[i] = Some(value);
            }
        }
        Some(())
    }

    /// Which of `names` a descriptor's key is: a string key of the same length and units, or
    /// for a name `@@description`, a symbol of that description.
    fn key_among(&mut self, key: u64, names: &[&'static str]) -> Option<&'static str> {
        let mut key = heap_object(key)?;
        let mut symbol = false;
        let symbols = self
            .layout
            .objects
            .as_ref()
            .map(|ol| (ol.symbol, ol.symbol_description));
        if let Some((symbol_type, description)) = symbols
            && self.instance_type(key) == Some(symbol_type)
        {
            let description = key + description;
            key = heap_object(self.memory.word(description)?)?;
            symbol = true;
        }
        if !self.is_string(key) {
            return None; // not a name at all
        }
        let units = self.string_units(key, 0, MAX_KEY + 1)?;
        names.iter().copied().find(|name| {
            let text = match name.strip_prefix("@@") {
                Some(description) if symbol => description,
                None if !symbol => name,
                _ => return false,
            };
            text.len() <= MAX_KEY && text.encode_utf16().eq(units.iter().copied())
        })
    }
}

/// Where a descriptor's details put its value; `None` for an accessor or an unboxed double.
fn slot_of(
    ol: &ObjectLayout,
    details: i64,
    value: u64,
    inobject_start: u64,
    inobject: u64,
) -> Option<Slot> {
    if details & ol.kind_mask != ol.kind_data {
        return None;
    }
    let location = (details & ol.location_mask) >> ol.location_shift;
    if location != ol.location_field {
        return Some(Slot::Constant(value));
    }
    if (details & ol.representation_mask) >> ol.representation_shift == ol.representation_double {
        return None;
    }
    let index = u64::try_from((details & ol.index_mask) >> ol.index_shift).ok()?;
    Some(if index < inobject {
        Slot::InObject(inobject_start + index)
    } else {
        Slot::OutOfObject(index - inobject)
    })
}
